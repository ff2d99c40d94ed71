"""File names of the cluster CA and node certificate, apart from pki so that reading them costs
no `cryptography` import (services only need it to mint or inspect certificates)."""

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
NODE_CERT_FILE = "node.crt"
NODE_KEY_FILE = "node.key"
