"""Starts test_plan_tpu.py's compiles (run_plans.py) in a background process once collection is done,
so they use one core while the rest of the suite runs on the other."""


def pytest_collection_finish(session):
    for item in session.items:
        if item.path.name == "test_plan_tpu.py":
            item.module.start_plans()
            return
