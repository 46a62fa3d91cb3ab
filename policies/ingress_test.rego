# Unit tests of the ingress hop (authz.rego, ingress.rego): `opa test -v policies`.
package greymesh.authz_test

# The input the bridge builds at the ingress: no client certificate, the hop in the context
# extensions, and the claims of a JWT Envoy verified (omitted when there was none).
ingress(method, path, claims) := object.union(req("", id("frontend"), method, path), {"attributes": {
	"context_extensions": {"greymesh.hop": "ingress", "greymesh.service": "frontend"},
	"metadata_context": {"filter_metadata": {"envoy.filters.http.jwt_authn": {"jwt_payload": claims}}},
}})

anonymous(method, path) := object.union(req("", id("frontend"), method, path), {"attributes": {
	"context_extensions": {"greymesh.hop": "ingress", "greymesh.service": "frontend"},
}})

admin := {"iss": "https://login.example", "sub": "ada", "roles": ["admin", "dev"]}

test_the_ingress_admits_an_anonymous_request_without_a_caller_identity if {
	d := decide(anonymous("GET", "/anything/x?q=1"))
	d.allow
	d.reason == "the ingress admits GET /anything/x to frontend"
}

test_admin_at_the_ingress_needs_a_jwt if {
	d := decide(anonymous("GET", "/admin/users"))
	not d.allow
	d.reason == "/admin/users at the ingress needs a JWT with role admin"
}

test_admin_at_the_ingress_needs_the_admin_role if {
	not allowed(ingress("GET", "/admin", {"sub": "bob", "roles": ["dev"]}))
	not allowed(ingress("GET", "/admin", {"sub": "bob"}))
	allowed(ingress("GET", "/admin/users", admin))
}

test_the_admin_rule_matches_whole_segments if {
	allowed(anonymous("GET", "/administrators"))
}

test_dot_segments_are_refused_at_the_ingress_too if {
	# Envoy resolves them first; a path that still has them (e.g. %2e%2e) is refused.
	reasons(anonymous("GET", "/anything/../admin")) == {"path /anything/../admin has '.' or '..' segments"}
}

test_a_mesh_call_without_a_certificate_is_still_refused if {
	# The hop comes from the listener's config; without it a request is a mesh call.
	d := decide(req("", id("frontend"), "GET", "/"))
	not d.allow
}

test_an_unknown_hop_is_refused if {
	doc := object.union(anonymous("GET", "/"), {"attributes": {"context_extensions": {"greymesh.hop": "side-door"}}})
	d := decide(doc)
	not d.allow
	d.reason == "unknown hop side-door"
}
