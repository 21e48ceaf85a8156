"""The host's pool of id ranges (policy) and its claims on disk (store): each unit a
range of its own, disjoint between environments, kept until its container goes."""

import os

import pytest

from ensemble.machine.container.id_range_store import HostIdRangeStore
from ensemble.machine.container.id_ranges import (
    POOL, RANGE_SIZE, IdPool, IdRange, IdRangesExhausted, require_granted,
)


def test_the_pool_is_enough_ranges_for_250_units_and_clear_of_the_old_shared_range():
    assert POOL.ranges >= 250 and POOL.first >= 165536
    assert POOL.last < 2 ** 31 - 1
    assert POOL.range(0) == IdRange(POOL.first, RANGE_SIZE)
    assert POOL.range(3).first == POOL.first + 3 * RANGE_SIZE
    assert POOL.index(POOL.range(7)) == 7
    with pytest.raises(IndexError):
        POOL.range(POOL.ranges)
    with pytest.raises(ValueError):
        POOL.index(IdRange(POOL.first + 1))
    assert POOL.subid_line() == f"root:{POOL.first}:{POOL.ranges * RANGE_SIZE}"


def test_the_lowest_free_range_is_chosen_and_an_exhausted_pool_says_so():
    pool = IdPool(first=1 << 20, ranges=3)
    assert pool.choose({}) == 0
    assert pool.choose({0: "a", 2: "c"}) == 1
    with pytest.raises(IdRangesExhausted, match="all 3 ranges of host ids 1048576-1245183 are claimed"):
        pool.choose({0: "a", 1: "b", 2: "c"})


def test_the_installed_pool_line_grants_every_range(tmp_path):
    files = [tmp_path / "subuid", tmp_path / "subgid"]
    for f in files:
        f.write_text(f"someone:100000:65536\n{POOL.subid_line()}\n")
    for index in (0, POOL.ranges - 1):
        require_granted(*POOL.range(index), files=[str(f) for f in files])


@pytest.fixture
def store(tmp_path):
    return HostIdRangeStore(str(tmp_path / "id-ranges"), IdPool(first=1 << 20, ranges=4))


def test_a_claim_is_kept_for_its_owner_and_freed_on_release(store, tmp_path):
    a, b = str(tmp_path / "lxc" / "a"), str(tmp_path / "lxc" / "b")
    first = store.claim(a)
    assert store.claim(a) == first  # asked again (a restart): the same range
    second = store.claim(b)
    assert second != first and store.owned_by(b) == second
    # Another store over the same directory (another agent, another environment)
    # sees both claims and takes neither.
    other = HostIdRangeStore(store.directory, store.pool)
    third = other.claim(str(tmp_path / "other-env" / "c"))
    assert third not in (first, second)
    assert store.release(a) and store.owned_by(a) is None and not store.release(a)
    # The freed range is the next one handed out.
    assert other.claim(str(tmp_path / "other-env" / "d")) == first


def test_claims_are_links_only_root_can_change(store, tmp_path):
    owner = str(tmp_path / "lxc" / "a")
    claimed = store.claim(owner)
    link = os.path.join(store.directory, str(store.pool.index(claimed)))
    assert os.readlink(link) == owner
    assert os.stat(store.directory).st_mode & 0o777 == 0o700


def test_a_full_pool_refuses_and_a_racing_claim_takes_the_next_range(store, tmp_path, monkeypatch):
    # Another agent claims range 0 between this one's look and its link.
    real_claims = store.claims
    raced = []

    def claims():
        found = real_claims()
        if not raced:
            raced.append(True)
            os.symlink(str(tmp_path / "elsewhere"), os.path.join(store.directory, "0"))
        return found

    monkeypatch.setattr(store, "claims", claims)
    assert store.claim(str(tmp_path / "lxc" / "a")) == store.pool.range(1)
    monkeypatch.undo()
    for name in ("b", "c"):
        store.claim(str(tmp_path / "lxc" / name))
    with pytest.raises(IdRangesExhausted):
        store.claim(str(tmp_path / "lxc" / "d"))


def test_orphans_of_one_lxc_path_are_freed_and_others_kept(store, tmp_path):
    lxc = tmp_path / "lxc"
    (lxc / "alive").mkdir(parents=True)
    alive = store.claim(str(lxc / "alive"))
    store.claim(str(lxc / "gone"))  # its removal was cut short: no directory
    elsewhere = store.claim(str(tmp_path / "other" / "gone"))  # another agent's
    assert len(store.release_orphans(str(lxc))) == 1
    assert set(store.claims()) == {store.pool.index(alive), store.pool.index(elsewhere)}
