"""The audit trail: FHIR AuditEvents following IHE BALP (Basic Audit Log Patterns)."""
