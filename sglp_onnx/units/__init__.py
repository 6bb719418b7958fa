"""Finding prunable units: residual joins recognised by the patterns in
`patterns/`, grouped into layers, with what each unit owns."""
