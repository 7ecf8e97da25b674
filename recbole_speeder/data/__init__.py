"""RecBole-side data: the Speeder dataset, item feature files and item text."""
