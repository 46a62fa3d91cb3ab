# Unit tests of policies/authz.rego: `opa test -v policies` (greymesh policy test).
package greymesh.authz_test

import data.greymesh.authz

# A small mesh: frontend -> orders -> inventory; billing -> {payments, inventory};
# reporting declares an edge to payments but lacks the pci tag that payments demands.
mesh := {
	"trust_domain": "greymesh.local",
	"services": {
		"frontend": {
			"spiffe_id": id("frontend"),
			"namespace": "demo",
			"tags": ["gdpr-region:eu"],
			"calls": {"orders": {}},
		},
		"orders": {
			"spiffe_id": id("orders"),
			"namespace": "demo",
			"tags": ["gdpr-region:eu"],
			"calls": {"inventory": {"methods": []}},
		},
		"billing": {
			"spiffe_id": id("billing"),
			"namespace": "demo",
			"tags": ["pci"],
			"calls": {
				"payments": {"methods": ["POST", "get"], "path_prefixes": ["/charge", "/refund/"]},
				"inventory": {},
			},
		},
		"payments": {"spiffe_id": id("payments"), "namespace": "demo", "tags": ["pci"], "calls": {}},
		"inventory": {"spiffe_id": id("inventory"), "namespace": "demo"},
		"reporting": {
			"spiffe_id": id("reporting"),
			"namespace": "back-office",
			"tags": [],
			"calls": {"payments": {}},
		},
	},
}

id(name) := sprintf("spiffe://greymesh.local/ns/demo/sa/%s", [name])

# The input controlplane/authz.py builds for a request from -> to.
req(from, to, method, path) := {
	"attributes": {
		"source": {"principal": from},
		"destination": {"principal": to},
		"request": {"http": {"method": method, "path": path, "host": "x", "headers": {}}},
	},
	"parsed_path": [s | some s in split(split(path, "?")[0], "/"); s != ""],
}

call(from, to, method, path) := req(id(from), id(to), method, path)

decide(doc) := d if {
	d := authz.decision with input as doc with data.greymesh.mesh as mesh
}

reasons(doc) := r if {
	r := authz.deny with input as doc with data.greymesh.mesh as mesh
}

allowed(doc) if decide(doc).allow

# --- declared edges -------------------------------------------------------------

test_a_declared_edge_is_allowed_with_a_reason if {
	decide(call("frontend", "orders", "GET", "/")) == {"allow": true, "reason": "frontend may call orders"}
}

test_an_edge_without_rules_allows_any_method_and_path if {
	allowed(call("frontend", "orders", "DELETE", "/anything/at/all?x=1"))
}

test_an_empty_methods_list_allows_any_method if {
	allowed(call("orders", "inventory", "PATCH", "/stock"))
}

test_tags_may_be_left_out_of_the_mesh_data if {
	# inventory has neither tags nor calls
	allowed(call("orders", "inventory", "GET", "/stock"))
}

# --- undeclared edges -----------------------------------------------------------------

test_an_undeclared_edge_is_denied if {
	d := decide(call("frontend", "inventory", "GET", "/stock"))
	not d.allow
	d.reason == "frontend may not call inventory: not in its callers"
}

test_calls_are_directional if {
	reasons(call("orders", "frontend", "GET", "/")) == {"orders may not call frontend: not in its callers"}
}

test_a_service_that_nobody_calls_cannot_be_called if {
	reasons(call("payments", "reporting", "GET", "/")) == {"payments may not call reporting: not in its callers"}
}

test_a_service_may_not_call_itself_unless_declared if {
	not allowed(call("orders", "orders", "GET", "/"))
}

test_every_reason_is_reported_sorted_and_joined if {
	d := decide(call("frontend", "payments", "POST", "/charge"))
	not d.allow
	d.reason == "frontend may not call payments: not in its callers; frontend may not call payments: payments is tagged pci and frontend is not"
}

# --- identities -----------------------------------------------------------------------

test_a_caller_without_a_certificate_has_no_identity if {
	d := decide(req("", id("orders"), "GET", "/"))
	not d.allow
	d.reason == "caller has no mesh identity: the request carried no verified client certificate"
}

test_a_caller_from_another_trust_domain_has_no_identity if {
	reasons(req("spiffe://evil.example/ns/demo/sa/frontend", id("orders"), "GET", "/")) == {"caller has no mesh identity: spiffe://evil.example/ns/demo/sa/frontend is not a service of this mesh"}
}

test_an_identity_claimed_in_a_header_counts_for_nothing if {
	doc := json.patch(req("", id("orders"), "GET", "/"), [{
		"op": "add",
		"path": "/attributes/request/http/headers/x-forwarded-client-cert",
		"value": sprintf("URI=%s", [id("frontend")]),
	}])
	not allowed(doc)
}

test_an_unknown_callee_is_denied if {
	reasons(req(id("frontend"), "spiffe://greymesh.local/ns/demo/sa/ghost", "GET", "/")) == {"callee has no mesh identity: spiffe://greymesh.local/ns/demo/sa/ghost is not a service of this mesh"}
}

test_a_missing_destination_is_denied if {
	reasons(req(id("frontend"), "", "GET", "/")) == {"callee has no mesh identity: the request names no destination principal"}
}

test_an_empty_input_is_denied_with_a_decision if {
	d := decide({})
	d.allow == false
	contains(d.reason, "caller has no mesh identity")
}

test_without_mesh_data_everything_is_denied if {
	d := authz.decision with input as call("frontend", "orders", "GET", "/")
	d.allow == false
	contains(d.reason, "is not a service of this mesh")
}

# --- edge rules: methods ----------------------------------------------------------------

test_an_allowed_method_passes if {
	allowed(call("billing", "payments", "POST", "/charge"))
}

test_methods_match_case_insensitively if {
	allowed(call("billing", "payments", "post", "/charge"))
	allowed(call("billing", "payments", "GET", "/charge")) # listed as "get"
}

test_another_method_is_denied_with_the_allowed_ones if {
	reasons(call("billing", "payments", "DELETE", "/charge")) == {"billing may not call payments with DELETE: allowed methods are POST, get"}
}

# --- edge rules: path prefixes ----------------------------------------------------------

test_a_path_under_a_prefix_passes if {
	allowed(call("billing", "payments", "POST", "/charge/42"))
	allowed(call("billing", "payments", "POST", "/refund/7"))
}

test_a_trailing_slash_on_a_prefix_changes_nothing if {
	allowed(call("billing", "payments", "POST", "/refund"))
}

test_prefixes_match_whole_segments if {
	reasons(call("billing", "payments", "POST", "/chargeback")) == {"billing may not call payments at /chargeback: allowed path prefixes are /charge, /refund/"}
}

test_the_root_path_is_outside_the_prefixes if {
	not allowed(call("billing", "payments", "POST", "/"))
}

test_the_query_string_is_not_part_of_the_path if {
	allowed(call("billing", "payments", "POST", "/charge?next=/admin"))
}

test_dot_segments_are_denied if {
	r := reasons(call("billing", "payments", "POST", "/charge/../admin"))
	"path /charge/../admin has '.' or '..' segments" in r
}

test_a_missing_parsed_path_fails_closed if {
	doc := json.remove(call("billing", "payments", "POST", "/charge"), ["parsed_path"])
	not allowed(doc)
}

# --- tag rules --------------------------------------------------------------------------

test_pci_services_can_be_called_by_pci_services if {
	allowed(call("billing", "payments", "POST", "/charge"))
}

test_pci_services_cannot_be_called_by_untagged_services_even_on_a_declared_edge if {
	reasons(call("reporting", "payments", "GET", "/")) == {"reporting may not call payments: payments is tagged pci and reporting is not"}
}

test_being_tagged_pci_does_not_restrict_calling_untagged_services if {
	allowed(call("billing", "inventory", "GET", "/"))
}
