"""The activation store on disk: its layout (`layout`) and the resumable writer (`writer`).

The reader is a data source: `saejax.data.store.StoreSource`.
"""
