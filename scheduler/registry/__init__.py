"""The golden path's pure domain: model registry policy, promotion gates, the audit chain and deployment manifests."""
