"""Shared test helpers: multiprocess runner, the toy task, the layout oracle. No test file imports another."""
