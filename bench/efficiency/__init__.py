"""The search-efficiency benchmark as modules: problems, one run (runner), the report."""
