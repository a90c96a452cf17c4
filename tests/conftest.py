"""pytest puts this folder on sys.path (rootdir-relative conftest), so tests import `helpers` directly."""
