"""runtime.usable_cpus: the one "usable CPUs" rule behind the preprocessing pool, the predict/evaluate pool
and the torch threads per worker. An embedded cluster declares more logical CPUs than the machine has
cores."""

from __future__ import annotations

import os
import sys
import types

import pytest

from mmfusion import runtime


def fake_ray(cpus: float, nodes: list[dict], here: str = "10.0.0.1") -> types.SimpleNamespace:
    util = types.SimpleNamespace(get_node_ip_address=lambda: here)
    return types.SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": cpus},
                                 nodes=lambda: nodes, util=util)


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)


def test_without_ray_the_machine_cores(two_cores, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    assert runtime.usable_cpus() == 2.0
    assert runtime.usable_cpus(local=False) == 2.0


def test_one_node_on_this_machine_is_capped_at_its_cores(two_cores, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", fake_ray(4, [{"Alive": True, "NodeManagerAddress": "10.0.0.1"}]))
    assert runtime.usable_cpus() == 2.0  # the embedded cluster's 4 logical CPUs are 2 cores
    assert runtime.usable_cpus(local=True) == 2.0


def node(address: str, alive: bool = True) -> dict:
    return {"Alive": alive, "NodeManagerAddress": address}


def test_a_remote_or_multi_node_cluster_gives_its_cpus(two_cores, monkeypatch):
    remote = [node("10.0.0.9")]
    monkeypatch.setitem(sys.modules, "ray", fake_ray(16, remote))
    assert runtime.usable_cpus() == 16.0
    two = [node("10.0.0.1"), node("10.0.0.2")]
    monkeypatch.setitem(sys.modules, "ray", fake_ray(16, two))
    assert runtime.usable_cpus() == 16.0
    dead = [node("10.0.0.1"), node("10.0.0.2", alive=False)]
    monkeypatch.setitem(sys.modules, "ray", fake_ray(8, dead))
    assert runtime.usable_cpus() == 2.0  # a dead node does not count
    assert runtime.usable_cpus(local=False) == 8.0
