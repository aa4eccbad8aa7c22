"""One session per supported Python: `nox` runs them all, `nox -s tests-3.12` one of them.

Each builds a fresh virtual environment from the interpreters on PATH (pyenv's shims work), installs
the package with its test extra and runs the README's test command.
"""
import nox

PYTHONS = ["3.11", "3.12", "3.13"]  # keep in step with requires-python and the classifiers

nox.options.sessions = ["tests", "lint"]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-n", "2", "-q", *session.posargs)


@nox.session(python=PYTHONS[0])
def lint(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy", "ruff")
    session.run("ruff", "check", ".")
    session.run("mypy")
