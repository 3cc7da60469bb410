"""Storage formats shared by prep (writers) and train (readers). Imports none of our packages."""
