"""Starts test_tpu_compile.py's AOT compiles in a background process once collection is done.

The compiles (libtpu, Mosaic; ~30 s of one core) then run beside the
interpret-mode tests, which use the other core, instead of after them.
"""


def pytest_collection_finish(session):
    for item in session.items:
        if item.path.name == "test_tpu_compile.py":
            item.module.start_compiles()
            return
