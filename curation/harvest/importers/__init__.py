"""Log importers: each maps one format's rows to canonical records (see ``formats.IMPORTERS``)."""
