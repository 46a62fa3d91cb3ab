# Rules for requests from outside the mesh, at the entrypoint's ingress (hop "ingress").
#
# End users prove who they are with a JWT that Envoy verifies (mesh.yaml ingress.jwt:
# issuer, audiences, JWKS); its claims are `jwt_claims` (authz.rego), {} without a token.
# A rule here says what a request needs, as a `deny` entry with a reason.
package greymesh.authz

# The admin API behind the ingress is for administrators only: a verified JWT whose
# `roles` claim holds "admin".  /admin is matched by whole segments, on the normalized path.
deny contains sprintf("%s at the ingress needs a JWT with role admin", [request_path]) if {
	hop == "ingress"
	count(path_segments) > 0
	path_segments[0] == "admin"
	not "admin" in object.get(jwt_claims, "roles", [])
}
