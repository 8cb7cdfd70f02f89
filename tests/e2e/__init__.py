"""End-to-end tests against a real Label Studio server (marked ``e2e``)."""
