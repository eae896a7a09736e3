open('/tmp/pytest-of-root/pytest-123/test_registry_load_never_runs_0/pwned', 'w').close()
