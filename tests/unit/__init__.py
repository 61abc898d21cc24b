"""Tests of single parts: no engine, no server process, no Ray."""
