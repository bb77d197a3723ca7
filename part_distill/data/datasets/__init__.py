"""Dataset registrations (DatasetCatalog / MetadataCatalog); importing a module registers its names."""
