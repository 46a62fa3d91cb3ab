# Unit tests of policies/system/authz.rego (run with the rest: `opa test policies`).
package system.authz_test

import data.system.authz

greymesh := {
	"clients": {
		crypto.sha256("admin-token"): "control_plane",
		crypto.sha256("bridge-token"): "authz_bridge",
	},
	"paths": {
		"decision": ["v1", "data", "greymesh", "authz", "decision"],
		"mesh": ["v1", "data", "greymesh", "mesh"],
	},
}

allowed(method, path, token) if {
	req := object.union({"method": method, "path": split(trim_prefix(path, "/"), "/")}, identity(token))
	authz.allow with input as req with data.system.greymesh as greymesh
}

identity(token) := {} if token == ""

identity(token) := {"identity": token} if token != ""

test_health_needs_no_token if {
	allowed("GET", "/health", "")
	not allowed("POST", "/health", "")
}

test_nothing_else_without_a_token if {
	not allowed("GET", "/v1/policies", "")
	not allowed("POST", "/v1/data/greymesh/authz/decision", "")
	not allowed("GET", "/v1/data/greymesh/mesh", "")
	not allowed("GET", "/metrics", "")
}

test_a_wrong_token_is_no_token if {
	not allowed("POST", "/v1/data/greymesh/authz/decision", "guess")
	not allowed("GET", "/v1/policies", crypto.sha256("admin-token")) # the digest is not the token
}

test_the_bridge_may_only_ask_the_decision if {
	allowed("POST", "/v1/data/greymesh/authz/decision", "bridge-token")
	allowed("GET", "/v1/data/greymesh/authz/decision", "bridge-token")
	not allowed("PUT", "/v1/data/greymesh/authz/decision", "bridge-token")
	not allowed("POST", "/v1/data/greymesh/authz", "bridge-token")
	not allowed("POST", "/v1/data/greymesh/authz/decision/x", "bridge-token")
	not allowed("GET", "/v1/data/greymesh/mesh", "bridge-token")
	not allowed("PUT", "/v1/data/greymesh/mesh", "bridge-token")
	not allowed("GET", "/v1/policies", "bridge-token")
	not allowed("PUT", "/v1/policies/greymesh/authz.rego", "bridge-token")
	not allowed("POST", "/v1/query", "bridge-token")
}

test_the_control_plane_syncs_mesh_data_and_reads_what_runs if {
	allowed("PUT", "/v1/data/greymesh/mesh", "admin-token")
	allowed("GET", "/v1/data/greymesh/mesh", "admin-token")
	allowed("POST", "/v1/data/greymesh/authz/decision", "admin-token")
	allowed("GET", "/v1/data/system/bundles", "admin-token")
	allowed("GET", "/v1/policies", "admin-token")
}

test_nobody_writes_a_policy_or_other_data_through_the_api if {
	every token in ["admin-token", "bridge-token", ""] {
		not allowed("PUT", "/v1/policies/greymesh/authz.rego", token)
		not allowed("DELETE", "/v1/policies/greymesh/authz.rego", token)
		not allowed("PUT", "/v1/data/greymesh/authz", token)
		not allowed("PUT", "/v1/data/system/greymesh", token)
		not allowed("PATCH", "/v1/data", token)
		not allowed("PUT", "/v1/data", token)
		not allowed("DELETE", "/v1/data/greymesh/mesh", token)
		not allowed("GET", "/v1/data/system/greymesh", token)
		not allowed("GET", "/v1/data", token)
		not allowed("POST", "/v1/compile", token)
		not allowed("GET", "/v1/config", token)
	}
}
