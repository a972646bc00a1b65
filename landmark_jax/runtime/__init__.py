"""The ground floor: files (local, gs://, ram://), leases on them, the device
mesh, processes and program start-up. Imports nothing else of the package."""
