from edgeav.cli import entry

entry()
