"""The service against real servers: the FHIR test server in sandbox/fhir_server (Node), later a database."""
