/*
 * jwt.h - HS256 JSON Web Tokens, as Kling's API wants them (docs/protocol.md §9).
 *
 * A Kling key is a line "ACCESS_KEY:SECRET_KEY". The API takes
 * "Authorization: Bearer <JWT>" where the JWT is
 *   base64url({"alg":"HS256","typ":"JWT"}) . base64url(claims) . base64url(HMAC-SHA256)
 * with claims {"iss": ACCESS_KEY, "exp": now + ttl, "nbf": now - 5}.
 * Pure functions (libcrypto's HMAC), no clock of their own: unit-tested
 * against a token computed independently.
 */
#ifndef VIDQ_JWT_H
#define VIDQ_JWT_H

#include <stddef.h>
#include <stdint.h>

/* Not-before slack: a clock a little ahead of Kling's must not be refused. */
#define JWT_NBF_SLACK_S 5

/* The JWT for `access_key` signed with `secret_key`, issued at `now_s`
 * (unix seconds) and valid `ttl_s` seconds. Owned. */
char *jwt_hs256(const char *access_key, const char *secret_key, int64_t now_s, int64_t ttl_s);

/* base64url without padding (RFC 7515 §2) of n bytes; appended to out (NUL-ended). */
void base64url(const unsigned char *in, size_t n, char *out, size_t outsize);

#endif
