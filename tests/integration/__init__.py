"""The service against real servers: the FHIR test server in tests/fhir_server (Node), later a database."""
