"""Memory only, no policy: the page and slot allocators, the paged KV pool and the GDN state pool."""
