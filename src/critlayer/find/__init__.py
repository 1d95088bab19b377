"""Find the critical layers without task data: probes -> capture -> measures -> consensus -> selection -> result."""
