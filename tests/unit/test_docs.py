"""The README stays true to the code: its option table is the code's."""

from pathlib import Path

from scripts.options_table import options_table

ROOT = Path(__file__).resolve().parents[2]


def test_readme_option_table_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    assert options_table() in readme, "run: python -m scripts.options_table"


def test_readme_opens_with_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```sh\n")
    assert blocks[1].startswith("python3 -m venv .venv && .venv/bin/pip install . && ")
    assert blocks[2].startswith("bash scripts/test.sh\n")
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_rooms_example_is_a_valid_policy() -> None:
    import tomllib

    from wsserver.rooms import NamespacePolicy, RoomPolicy

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in readme.split("```toml\n")[1:] if b.startswith("[rooms]"))
    policy = RoomPolicy.from_table(tomllib.loads(block.split("```")[0])["rooms"])
    assert policy.default == NamespacePolicy()
    assert policy.namespaces["user"] == NamespacePolicy(join="owner", publish="none")
    assert policy.namespaces["chat"].join_leave
