# What OPA leaves out of its decision logs (OPA reads data.system.log.mask before it
# sends a decision to the tap service, so it never reaches Kafka or the store).
#
# The bridge gives the policy every request header, so rules can decide on credentials;
# the decision log must not carry them: bearer tokens, cookies and proxy credentials are
# removed from the logged input (the log records that they were masked, not their value).
package system.log

secret_headers := {"authorization", "cookie", "proxy-authorization"}

mask contains sprintf("/input/attributes/request/http/headers/%s", [name]) if some name in secret_headers
