"""The sweep's ordering: every round measures every point, each round in an order of its own."""

from __future__ import annotations

from bench.serving import shuffled


def test_each_round_orders_the_points_differently_and_reproducibly() -> None:
    points = list(range(14))
    orders = [shuffled(points, r) for r in range(5)]
    assert orders[0] == points and all(sorted(order) == points for order in orders)
    assert orders == [shuffled(points, r) for r in range(5)]  # the same plan, the same orders
    predecessors = {p: {order[order.index(p) - 1] for order in orders if order.index(p) > 0} for p in points}
    assert all(len(before) >= 2 for p, before in predecessors.items() if p != 0)
    assert shuffled([], 3) == []
