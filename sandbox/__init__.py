"""The sandbox EHR: a development tool that stands in for an EHR around imid-rems, made of real parts.

Not product code: nothing in `rems/`, `fhir_mappings/`, `cds_hooks/` or `smart_app/` imports it (the
`imid-rems sandbox ...` command loads it lazily). It holds the FHIR engine (`fhir_engine`, Medplum's
engine under Node), the synthetic IMiD population (`seed`), the SMART authorization server and FHIR
gateway, the EHR pages that launch the SMART app and fire the CDS hooks, and `make run`'s supervisor.
"""
