"""TLS for the HTTPS (IMS-compatible) listener: a local CA, its leaf, server contexts.

What a user sees of it is in docs/ims-endpoint.md. Nothing here is imported
unless TLS is configured, and nothing here imports ``cryptography`` at module
level: a broker without ``ims_listen`` must not pay for it (8-11 MiB of RSS
once keys are made, cryptography 38 to 50).

Its modules are drawn in docs/architecture.md ("The modules"); their public names
are importable from ``broker.tls``.

The local CA lives in the state directory (:func:`broker.files.state_dir`)::

    STATE/                  0700 when token-broker creates it
      ca.crt   0644         the CA certificate: what clients trust (`token-broker tls ca`)
      ca.key   0600         the CA private key (ECDSA P-256, PKCS#8, unencrypted)
      leaf.pem 0600         the daemon's leaf: private key, then certificate, in ONE file
      ca-bundle.crt 0644    system CAs + ca.crt (`token-broker tls ca --bundle`)
      .tls.lock 0600        serialises `init` and leaf issuance between processes

Security decisions, each with its test in tests/test_tls.py:

- The CA certificate carries **name constraints** permitting only
  ``127.0.0.0/8``, ``::1/128`` and ``localhost``, and ``pathlen 0``. The CA
  ends up in ``REQUESTS_CA_BUNDLE`` of tools that also talk to Adobe; whoever
  steals its key can still only vouch for loopback names, never for
  ``ims-na1.adobelogin.com``. OpenSSL (Python, curl, Node) enforces this on the
  trust anchor. So the local CA cannot serve a non-loopback ``ims_listen``: use
  ``tls_cert`` / ``tls_key`` there (:func:`load_cert_files`).
- Private keys are born 0600 (``O_EXCL`` with mode 0600, write, fsync,
  rename): there is no moment at which another user could open them.
- ECDSA P-256 for both keys: a key takes 0.03 ms to generate where RSA-2048
  takes 0.2 s and RSA-3072 0.6 s (measured here; the daemon issues its leaf at
  every start and renewal, on the event loop's machine); the handshake is
  smaller and faster; 128-bit security like RSA-3072; every client in scope
  (OpenSSL behind Python/requests/urllib3, curl, Node; Java) supports it.
  Nothing in umapi-client or the User Sync Tool needs RSA.
- The leaf key and certificate share one file, replaced atomically, so a
  reader (this process reloading, or ``doctor``) never sees a new key with an
  old certificate. It lives on disk beside the CA key, with the same
  protection: the CA key is strictly more powerful, so keeping the leaf key
  in memory only would protect nothing, and on disk ``doctor`` and
  ``openssl`` can inspect it.
"""

from __future__ import annotations

from broker.tls.certs import BACKDATE as BACKDATE
from broker.tls.certs import CertInfo as CertInfo
from broker.tls.certs import renew_at as renew_at
from broker.tls.checkup import doctor as doctor
from broker.tls.context import ServerCertificate as ServerCertificate
from broker.tls.context import load_cert_files as load_cert_files
from broker.tls.context import reload_cert_chain as reload_cert_chain
from broker.tls.context import server_context as server_context
from broker.tls.localca import Bundle as Bundle
from broker.tls.localca import TlsFiles as TlsFiles
from broker.tls.localca import ensure_leaf as ensure_leaf
from broker.tls.localca import init_ca as init_ca
from broker.tls.localca import issue_leaf as issue_leaf
from broker.tls.localca import published_ca as published_ca
from broker.tls.localca import start_over as start_over
from broker.tls.localca import system_ca_bundle as system_ca_bundle
from broker.tls.localca import write_bundle as write_bundle
