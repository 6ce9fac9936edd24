"""Run directory names: safe, ASCII, capped, unique."""

from sdsbridge.training.rundir import MAX_SLUG_LENGTH, create_run_dir, run_slug, slugify


def test_slug_is_safe_for_hostile_prompts(tmp_path):
    for prompt in ["../../etc/passwd", "a\nb\rc", "/abs/path", "..", "C:\\win\\sys", "ça va? 🍍", "", "   "]:
        slug = run_slug("bridge", prompt)
        assert slug and slug.isascii()
        assert "/" not in slug and "\\" not in slug and ".." not in slug and "\n" not in slug
        run_dir = create_run_dir(tmp_path / "runs", slug)
        assert run_dir.resolve().parent == (tmp_path / "runs").resolve()


def test_slug_examples_and_cap():
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert run_slug("sds", "A DSLR photo of a pineapple") == "sds-a-dslr-photo-of-a-pineapple"
    assert slugify("") == "run"
    assert len(run_slug("bridge", "word " * 100)) <= MAX_SLUG_LENGTH
    assert run_slug("bridge", "x", name="My Run") == "my-run"


def test_run_dirs_are_unique_and_never_reused(tmp_path):
    first = create_run_dir(tmp_path, "bridge-cat")
    (first / "keep.txt").write_text("precious")
    second = create_run_dir(tmp_path, "bridge-cat")
    third = create_run_dir(tmp_path, "bridge-cat")
    assert len({first, second, third}) == 3
    assert (first / "keep.txt").read_text() == "precious"
    assert second.name == "bridge-cat-2" and third.name == "bridge-cat-3"
