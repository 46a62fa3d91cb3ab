# greymesh service-to-service authorization: who may call whom.
#
# The ext_authz bridge (controlplane/authz.py) asks data.greymesh.authz.decision for
# every inbound request, with the input opa-envoy-plugin would build:
#   input.attributes.source.principal        caller SPIFFE ID, from the verified peer certificate
#   input.attributes.destination.principal   callee SPIFFE ID
#   input.attributes.request.http.method     "GET", "POST", ...
#   input.parsed_path                        path segments without the query: /charge/42?x=1 -> ["charge", "42"]
#   input.attributes.context_extensions      {"greymesh.hop": "ingress", "greymesh.service": <entrypoint>} at the ingress
#   input.attributes.metadata_context        at the ingress: the verified JWT's claims (see jwt_claims)
# It reads the document the control plane keeps in sync (shape in policies/README.md):
#   data.greymesh.mesh     services, their SPIFFE IDs, tags and calls (from mesh.yaml)
# The hash of the policy that decided is not the policy's to say: OPA reports the revision
# of the bundle it loaded (`greymesh policy push` sets it) with every decision.
#
# Deny by default: a request is allowed only along an edge the mesh declares, and
# only when no rule in `deny` objects. Every reason to refuse is a `deny` entry, a
# sentence a person can act on; the decision carries them all.
package greymesh.authz

# --- the decision ---------------------------------------------------------------

decision := {"allow": allow, "reason": reason}

default allow := false

allow if {
	hop == "mesh"
	declared_edge
	count(deny) == 0
}

# A request from outside the mesh, at the entrypoint's ingress: no caller identity to check
# (end users prove theirs with a JWT), so only the `deny` rules decide (ingress.rego).
allow if {
	hop == "ingress"
	count(deny) == 0
}

default reason := "denied: no rule allowed this request"

reason := sprintf("%s may call %s", [caller.name, callee.name]) if {
	hop == "mesh"
	allow
}

reason := sprintf("the ingress admits %s %s to %s", [method, request_path, ingress_service]) if {
	hop == "ingress"
	allow
}

reason := concat("; ", sort(deny)) if count(deny) > 0

# --- the mesh, indexed ------------------------------------------------------------

default services := {}

services := data.greymesh.mesh.services

# Each service by SPIFFE ID, with its name, its tags as a set and `calls` defaulted,
# so that rules can say `"pci" in caller.tags` whatever the mesh data leaves out.
service_by_id[svc.spiffe_id] := object.union(svc, {
	"name": name,
	"tags": {t | some t in object.get(svc, "tags", [])},
	"calls": object.get(svc, "calls", {}),
}) if {
	some name, svc in services
}

# The mesh declares each edge once, on the caller's side (`calls`, as in mesh.yaml).
# Looked up directly rather than through a callee -> callers index: an index is
# rebuilt over every pair of services on every query (15 ms at 55 services).
declared_edge if callee.name in object.keys(caller.calls)

# --- the request --------------------------------------------------------------------

# Which hop asks: "ingress" (set by the ingress listener's config, never by a request)
# or "mesh" (a sidecar's inbound listener: a call between services).
hop := object.get(input, ["attributes", "context_extensions", "greymesh.hop"], "mesh")

ingress_service := object.get(input, ["attributes", "context_extensions", "greymesh.service"], "")

# The claims of the JWT Envoy verified at the ingress (issuer, audience, signature and
# expiry already checked); {} when the request carried none.
jwt_claims := object.get(
	input,
	["attributes", "metadata_context", "filter_metadata", "envoy.filters.http.jwt_authn", "jwt_payload"],
	{},
)

caller_id := object.get(input, ["attributes", "source", "principal"], "")

callee_id := object.get(input, ["attributes", "destination", "principal"], "")

method := upper(object.get(input, ["attributes", "request", "http", "method"], ""))

path_segments := object.get(input, "parsed_path", [])

# For messages only: the path as matched, without the query string (it may hold secrets).
request_path := concat("/", ["", concat("/", path_segments)])

caller := service_by_id[caller_id]

callee := service_by_id[callee_id]

# The rules on the edge caller -> callee ({} when the edge has none).
edge := caller.calls[callee.name]

# A path prefix matches whole segments: /charge matches /charge and /charge/42, not /chargeback.
path_allowed if {
	some prefix in edge.path_prefixes
	want := [s | some s in split(prefix, "/"); s != ""]
	array.slice(path_segments, 0, count(want)) == want
}

# --- reasons to deny ------------------------------------------------------------------

deny contains "caller has no mesh identity: the request carried no verified client certificate" if {
	hop == "mesh"
	caller_id == ""
}

deny contains sprintf("caller has no mesh identity: %v is not a service of this mesh", [caller_id]) if {
	hop == "mesh"
	caller_id != ""
	not service_by_id[caller_id]
}

deny contains "callee has no mesh identity: the request names no destination principal" if {
	hop == "mesh"
	callee_id == ""
}

deny contains sprintf("callee has no mesh identity: %v is not a service of this mesh", [callee_id]) if {
	hop == "mesh"
	callee_id != ""
	not service_by_id[callee_id]
}

deny contains sprintf("unknown hop %v", [hop]) if not hop in {"mesh", "ingress"}

deny contains sprintf("%s may not call %s: not in its callers", [caller.name, callee.name]) if {
	caller.name # both are mesh services (the identity rules above cover the rest)
	callee.name
	not declared_edge
}

deny contains msg if {
	count(edge.methods) > 0
	not method in {upper(m) | some m in edge.methods}
	msg := sprintf("%s may not call %s with %s: allowed methods are %s", [caller.name, callee.name, method, concat(", ", edge.methods)])
}

deny contains msg if {
	count(edge.path_prefixes) > 0
	not path_allowed
	msg := sprintf("%s may not call %s at %s: allowed path prefixes are %s", [caller.name, callee.name, request_path, concat(", ", edge.path_prefixes)])
}

# "." and ".." segments would let /charge/../admin pass a /charge prefix; Envoy
# normalizes paths before ext_authz, so a request that still has them is refused.
deny contains sprintf("path %s has '.' or '..' segments", [request_path]) if {
	some s in path_segments
	s in {".", ".."}
}

# --- tag rules: one line each ---------------------------------------------------------

# Services tagged pci may only be called by services tagged pci.
deny contains sprintf("%s may not call %s: %s is tagged pci and %s is not", [caller.name, callee.name, callee.name, caller.name]) if "pci" in (callee.tags - caller.tags)
