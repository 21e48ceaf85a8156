from setuptools import find_packages, setup

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
        # Hook tools: hooks find them next to the ensemble command.
        "open-port = ensemble.unit.ports:open_port",
        "close-port = ensemble.unit.ports:close_port",
    ]},
)
