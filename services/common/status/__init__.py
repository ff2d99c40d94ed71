"""The node status model: what each service answered, and the report built from it (used by
`peermirror status` and the registry's status page)."""
