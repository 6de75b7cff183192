"""Charges: the per-endpoint load the EPP's own scorers count."""

from __future__ import annotations

from epp.plugins.charges import Charges


def test_a_charge_adds_to_each_key_and_is_taken_back_once() -> None:
    c = Charges(10.0, lambda: 0.0)
    a = c.charge(["d", "p"])
    b = c.charge(["d"], 5)
    assert c.totals == {"d": 6, "p": 1} and len(c) == 2
    c.release(a)
    c.release(a)
    assert c.totals == {"d": 5}
    c.release(b)
    assert c.totals == {} and len(c) == 0


def test_nothing_to_charge_holds_nothing() -> None:
    c = Charges(10.0, lambda: 0.0)
    c.release(c.charge([]))
    c.release(c.charge(["d"], 0))
    assert c.totals == {} and len(c) == 0


def test_charges_expire_in_order_after_the_timeout() -> None:
    now = [0.0]
    c = Charges(10.0, lambda: now[0])
    first = c.charge(["a"], 3)
    now[0] = 5.0
    c.charge(["a"], 4)
    now[0] = 10.0
    c.expire()
    assert c.totals == {"a": 4}
    c.release(first)  # expired already: nothing more comes off
    assert c.totals == {"a": 4}
    now[0] = 15.0
    c.expire()
    assert c.totals == {} and len(c) == 0


def test_a_forgotten_endpoint_is_not_counted_again_when_its_charges_end() -> None:
    c = Charges(10.0, lambda: 0.0)
    both = c.charge(["gone", "kept"])
    c.forget({"gone"})
    assert c.totals == {"kept": 1}
    c.charge(["gone"])  # the endpoint came back
    c.release(both)
    assert c.totals == {"gone": 1}
