"""Test support code shared by the suites: a throwaway PostgreSQL server (``tests.support.postgres``)."""
