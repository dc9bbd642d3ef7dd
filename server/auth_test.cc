// Token files and the open server's rules (server/auth.h). The role matrix of every RPC over real
// gRPC calls is tests/security/test_security.py.
#include "server/auth.h"

#include <grpcpp/grpcpp.h>

#include <string>

#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace fpxint::server {
namespace {

TEST(Authorizer, TokenFileErrorsNameTheLine) {
  struct Bad {
    const char* text;
    const char* want;
  } bad[] = {
      {"", "no tokens"},
      {"# only a comment\n", "no tokens"},
      {"short-token quantize\n", "line 1: tokens have at least 16 characters"},
      {"# c\nadmin-token-0123456789 admin\nquantize-token-0123456789 root\n",
       "line 3: unknown role 'root'; accepted: quantize, infer, admin"},
      {"admin-token-0123456789\n", "line 1: expected '<token> <role>"},
      {"admin-token-0123456789 admin alice extra\n", "line 1: expected"},
  };
  for (const Bad& b : bad) {
    auto a = Authorizer::FromText(b.text);
    ASSERT_FALSE(a.ok()) << b.text;
    EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(a.status().message(), b.want)) << a.status();
  }
  auto ok = Authorizer::FromText(
      "admin-token-0123456789 admin alice  # a comment\nboth-token-0123456789 quantize,infer\n");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_FALSE(ok->open());
}

TEST(Authorizer, OpenServerHasNoAdmin) {
  Authorizer open;
  grpc::ServerContext ctx;
  unsigned roles = 0;
  std::string name;
  EXPECT_TRUE(open.Check(&ctx, kRoleQuantize, &roles, &name).ok());
  EXPECT_EQ(roles & kRoleAdmin, 0u);
  EXPECT_EQ(name, "anonymous");
  EXPECT_EQ(open.Check(&ctx, kRoleAdmin).code(), absl::StatusCode::kPermissionDenied);
}

TEST(Authorizer, NoTokenIsUnauthenticated) {
  auto a = Authorizer::FromText("admin-token-0123456789 admin\n");
  ASSERT_TRUE(a.ok());
  grpc::ServerContext ctx;  // no authorization metadata
  EXPECT_EQ(a->Check(&ctx, kRoleInfer).code(), absl::StatusCode::kUnauthenticated);
}

}  // namespace
}  // namespace fpxint::server
