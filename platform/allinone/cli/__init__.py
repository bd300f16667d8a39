"""The command line: ``allinone`` (``allinone.cli.main:main``), its console and closing block."""
