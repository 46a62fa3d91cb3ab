# Unit tests of policies/log_mask.rego: OPA masks credentials in its decision logs.
package system.log_test

import data.system.log

test_credentials_are_masked if {
	log.mask == {
		"/input/attributes/request/http/headers/authorization",
		"/input/attributes/request/http/headers/cookie",
		"/input/attributes/request/http/headers/proxy-authorization",
	}
}
