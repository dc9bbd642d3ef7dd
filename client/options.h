// File: client/options.h
//
// The flags every `fpxint` command shares (README.md "CLI reference"). Service commands use the
// connection fields; the offline `expand` uses only json/quiet.
#ifndef FPXINT_CLIENT_OPTIONS_H_
#define FPXINT_CLIENT_OPTIONS_H_

#include <string>

namespace fpxint::client {

struct GlobalOptions {
  bool json = false;   // machine-readable output on stdout (one JSON document per command)
  bool quiet = false;  // no progress and no summary; errors still go to stderr
  std::string server = "127.0.0.1:8001";  // gRPC address of fpxint-server (FPXINT_SERVER)
  std::string token;                       // bearer token (FPXINT_TOKEN)
  std::string tls_ca;                      // PEM roots: connect with TLS (FPXINT_TLS_CA)
  std::string tls_cert;                    // client certificate for mutual TLS (PEM)
  std::string tls_key;                     // its private key (PEM)
  double timeout_seconds = 30;             // deadline of each unary call; 0 = none
};

}  // namespace fpxint::client

#endif  // FPXINT_CLIENT_OPTIONS_H_
