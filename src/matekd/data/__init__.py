"""CIFAR-10 data: raw sources (`sources`), the prepare step (`prepare`), the prepared splits every
stage reads (`prepared`) and the `fetch` command. Kept empty so that importing one of them
does not import the others (each stage's DVC deps are its import closure)."""
