"""``filedock.record``: value records behave as the frozen dataclasses they replaced.

Each behaviour is checked side by side with a real ``@dataclass(frozen=True)`` of the same shape,
so a difference between the two shows up here rather than in a caller.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from filedock import record
from filedock.config import Limits
from filedock.record import FrozenInstanceError, field


@record.record
class Point:
    x: int
    y: int = 0
    tags: list = field(factory=list)
    note: str | None = field(default=None, compare=False)

    def norm1(self) -> int:
        return abs(self.x) + abs(self.y)


@dataclasses.dataclass(frozen=True)
class DPoint:
    x: int
    y: int = 0
    tags: list = dataclasses.field(default_factory=list)
    note: str | None = dataclasses.field(default=None, compare=False)


@record.record(frozen=False)
class Counter:
    name: str
    count: int = 0


@record.record
class Line:
    start: Point
    end: Point


def test_construction_matches_dataclass_positional_keyword_and_defaults():
    for args, kwargs in (((1,), {}), ((1, 2), {}), ((), {"x": 3, "y": 4}), ((5,), {"note": "n"}),
                         ((1, 2, [7]), {}), ((1,), {"tags": [1], "y": 9})):
        r, d = Point(*args, **kwargs), DPoint(*args, **kwargs)
        assert (r.x, r.y, r.tags, r.note) == (d.x, d.y, d.tags, d.note)
        assert repr(r) == repr(d).replace("DPoint", "Point")


def test_a_factory_makes_a_fresh_value_for_each_instance_and_the_class_keeps_no_field_object():
    a, b = Point(1), Point(1)
    a.tags.append(1)
    assert b.tags == [] and a.tags == [1]
    assert "tags" not in Point.__dict__
    assert Point.note is None and Point.y == 0  # class-level defaults stay, as on a dataclass


@pytest.mark.parametrize("args, kwargs, message", [
    ((), {}, "missing required argument: 'x'"),
    ((1, 2, [], None, 5), {}, "takes 4 positional arguments but 5 were given"),
    ((1,), {"x": 2}, "got multiple values for argument 'x'"),
    ((1,), {"z": 2}, "got an unexpected keyword argument 'z'"),
])
def test_wrong_arguments_are_a_type_error_naming_the_problem(args, kwargs, message):
    with pytest.raises(TypeError, match=message):
        Point(*args, **kwargs)
    with pytest.raises(TypeError):
        DPoint(*args, **kwargs)


def test_frozen_records_refuse_assignment_and_deletion():
    p = Point(1)
    with pytest.raises(FrozenInstanceError, match="cannot assign to field 'x'"):
        p.x = 2
    with pytest.raises(FrozenInstanceError):
        p.other = 2
    with pytest.raises(AttributeError):  # FrozenInstanceError is one, as dataclasses' is
        del p.y
    assert (p.x, p.y) == (1, 0)


def test_equality_and_hash_follow_the_compared_fields_and_the_exact_class():
    assert Point(1, 2, note="a") == Point(1, 2, note="b")
    assert hash(Point(1, 2, (3,), note="a")) == hash(Point(1, 2, (3,), note="b"))
    assert Point(1, 2) != Point(2, 1)
    assert Point(1, 2) != DPoint(1, 2) and Point(1) != (1, 0, [], None)

    @record.record
    class Other:
        x: int
        y: int = 0
        tags: list = field(factory=list)
        note: str | None = None

    assert Point(1) != Other(1)
    assert {Point(1, 2, ()), Point(1, 2, ())} == {Point(1, 2, ())}


def test_a_mutable_record_allows_assignment_and_is_unhashable_like_a_dataclass():
    c = Counter("a")
    c.count += 1
    assert c == Counter("a", 1) and repr(c) == "Counter(name='a', count=1)"
    with pytest.raises(TypeError):
        hash(c)


def test_methods_of_the_class_body_are_kept_and_match_patterns_work():
    assert Point(-3, 4).norm1() == 7
    match Point(1, 2):
        case Point(x, y):
            assert (x, y) == (1, 2)
        case _:
            pytest.fail("positional pattern did not match")
    assert Point.__match_args__ == DPoint.__match_args__


def test_replace_asdict_and_field_names_stand_in_for_dataclasses():
    p = Point(1, 2, [3], note="n")
    q = record.replace(p, y=5)
    assert (q.x, q.y, q.tags, q.note) == (1, 5, [3], "n") and p.y == 2
    with pytest.raises(TypeError):
        record.replace(p, nope=1)
    line = Line(Point(1), Point(2, tags=[Point(3)]))
    assert record.asdict(line) == dataclasses.asdict(_dline())
    assert record.field_names(Point) == record.field_names(p) == ("x", "y", "tags", "note")


def _dline():
    @dataclasses.dataclass
    class DLine:
        start: DPoint
        end: DPoint
    return DLine(DPoint(1), DPoint(2, tags=[DPoint(3)]))


def test_copies_and_pickles_are_equal_records():
    p = Point(1, 2, [3])
    assert copy.copy(p) == p and copy.deepcopy(p) == p and copy.deepcopy(p).tags is not p.tags
    assert pickle.loads(pickle.dumps(Limits(max_file_size=5))) == Limits(max_file_size=5)


def test_a_required_field_after_a_defaulted_one_is_refused_at_class_creation():
    with pytest.raises(TypeError, match="'b' without a default follows 'a'"):
        @record.record
        class Bad:
            a: int = 0
            b: int


def test_a_record_subclass_adds_its_fields_after_the_base_fields():
    @record.record
    class Point3(Point):
        z: int = 0

    p = Point3(1, 2, [], None, 3)
    assert (p.x, p.y, p.z) == (1, 2, 3) and record.field_names(Point3)[-1] == "z"
    assert p != Point(1, 2)


@given(st.integers(), st.integers(), st.lists(st.integers(), max_size=3))
def test_records_and_dataclasses_agree_on_equality(x, y, tags):
    a, b = Point(x, y, tags), Point(y, x, tags)
    assert (a == b) == (DPoint(x, y, tags) == DPoint(y, x, tags))


def test_limits_overrides_and_names_work_through_record():
    limits = Limits().with_overrides(["max_file_size=2G", "idle-timeout=1.5"])
    assert limits.max_file_size == 2 << 30 and limits.idle_timeout == 1.5
    assert limits.max_header == Limits().max_header
    assert "checkpoint_bytes" in Limits.names() and len(Limits.names()) == len(record.asdict(Limits()))


def test_a_client_upload_imports_neither_dataclasses_nor_inspect():
    """The point of ``record``: ``filedock upload``'s modules build without dataclasses."""
    code = ("import sys, filedock.cli, filedock.client.blocking, filedock.client.uploader, filedock.client.http;"
            "print(sorted(m for m in ('dataclasses', 'inspect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
