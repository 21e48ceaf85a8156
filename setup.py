from setuptools import find_packages, setup

# The names of the hook tools' console scripts, as pyjuju's charms call them. Kept in
# ensemble/unit/tools/cli.py too; setup.py cannot import the package it installs.
TOOLS = {
    "relation-get": "relation_get",
    "relation-set": "relation_set",
    "relation-list": "relation_list",
    "relation-ids": "relation_ids",
    "config-get": "config_get",
    "unit-get": "unit_get",
    "open-port": "open_port",
    "close-port": "close_port",
    "juju-log": "juju_log",
    "ensemble-log": "ensemble_log",
}

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
