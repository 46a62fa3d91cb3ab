# OPA's own authorization: who may use OPA's REST API (`opa run --authentication=token
# --authorization=basic`). OPA asks data.system.authz.allow before every request.
#
# Not part of the mesh's policy: the runtime loads it from this directory when it starts
# OPA (a bundle of its own, greymesh/runtime/opa.py), and `greymesh policy push` never
# pushes it. What it reads, from the same bundle (written by the runtime at `greymesh up`):
#   data.system.greymesh.clients          {sha256 of a client's bearer token: client name}
#   data.system.greymesh.paths.decision   the decision the bridge asks, as URL path segments
#   data.system.greymesh.paths.mesh       the mesh data the control plane syncs, likewise
# OPA passes the bearer token as input.identity, the URL path as input.path (segments).
# It runs before every request OPA serves, the bridge's decisions included: one lookup
# and a few comparisons, no iteration.
#
# Nobody may write a policy through the REST API: the mesh's policy reaches OPA only as
# the bundle `greymesh policy push` writes after its check and test gate.
package system.authz

default allow := false

# The supervisor's readiness probe, without a token.
allow if {
	input.method == "GET"
	input.path == ["health"]
}

# The client whose token the request presents (undefined without a token or with a wrong one).
client := data.system.greymesh.clients[crypto.sha256(input.identity)]

# The decision: the bridge asks it for every request; the control plane for `greymesh policy eval`.
allow if {
	input.path == data.system.greymesh.paths.decision
	input.method in {"GET", "POST"}
	client in {"authz_bridge", "control_plane"}
}

allow if {
	client == "control_plane"
	[input.method, input.path] in control_plane_requests
}

control_plane_requests := {
	# the mesh data sync (controlplane.daemon) and its check of what OPA holds
	["GET", data.system.greymesh.paths.mesh],
	["PUT", data.system.greymesh.paths.mesh],
	# which policy bundle revision OPA runs (push waits for it; the runtime's restore reads it)
	["GET", ["v1", "data", "system", "bundles"]],
	# the running modules, for `greymesh policy diff`
	["GET", ["v1", "policies"]],
}
