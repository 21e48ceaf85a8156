import os
import runpy

from setuptools import find_packages, setup

# The hook tools' names, from a module that imports nothing (the package is not installed
# yet while setup.py runs).
TOOLS = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ensemble", "unit", "tools",
                                    "names.py"))["TOOLS"]

setup(
    name="ensemble",
    version="0.1.0",
    description="Ensemble unit isolation: every unit in its own LXC container",
    packages=find_packages(include=["ensemble", "ensemble.*"]),
    python_requires=">=3.11",
    install_requires=[
        "twisted>=22.4",
        "kazoo>=2.8",
        "pyroute2>=0.7",
        "pyyaml>=6.0",
        "netaddr>=0.8",
        # A unit agent forked in by the agent starter shows its own command line.
        "setproctitle>=1.2",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-twisted>=1.14", "hypothesis>=6"],
    },
    entry_points={"console_scripts": [
        "ensemble = ensemble.cli:main",
        # Hook tools (ensemble.unit.tools.cli.TOOLS): hooks find them next to python.
        *(f"{tool} = ensemble.unit.tools.cli:{function}" for tool, function in TOOLS.items()),
    ]},
)
