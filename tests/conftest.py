"""Fixtures every test module can use: a ClickHouse server and fresh stores of both
backends (tests/support/clickhouse.py)."""

pytest_plugins = ("tests.support.clickhouse",)
