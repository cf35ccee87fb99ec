"""Each pytest worker's share of the cores (conformance/cores.py), also where the suite runs installed
(`pytest --pyargs dsv3_conformance.suite`)."""

from dsv3_conformance import cores

cores.share_with_pytest_workers()
