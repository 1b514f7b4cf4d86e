/*
 * jwt.c - HS256 JSON Web Tokens (see jwt.h).
 */
#include "jwt.h"
#include "util.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <string.h>

void base64url(const unsigned char *in, size_t n, char *out, size_t outsize)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t o = 0;
    VQ_ASSERT(outsize >= (n + 2) / 3 * 4 + 1);
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = tab[(v >> 18) & 63];
        out[o++] = tab[(v >> 12) & 63];
        if (i + 1 < n)
            out[o++] = tab[(v >> 6) & 63];
        if (i + 2 < n)
            out[o++] = tab[v & 63];
    }
    out[o] = '\0';
}

char *jwt_hs256(const char *access_key, const char *secret_key, int64_t now_s, int64_t ttl_s)
{
    static const char header[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    sbuf claims, tok;
    sbuf_init(&claims);
    sbuf_puts(&claims, "{\"iss\":");
    sbuf_json_str(&claims, access_key, strlen(access_key));
    sbuf_printf(&claims, ",\"exp\":%lld,\"nbf\":%lld}", (long long)(now_s + ttl_s),
                (long long)(now_s - JWT_NBF_SLACK_S));
    sbuf_init(&tok);
    char *enc = xmalloc((claims.len + sizeof header + 2) / 3 * 4 + 8);
    base64url((const unsigned char *)header, sizeof header - 1, enc, (sizeof header + 2) / 3 * 4 + 8);
    sbuf_puts(&tok, enc);
    sbuf_putc(&tok, '.');
    base64url((const unsigned char *)claims.buf, claims.len, enc, (claims.len + sizeof header + 2) / 3 * 4 + 8);
    sbuf_puts(&tok, enc);
    free(enc);
    sbuf_free(&claims);
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned maclen = 0;
    HMAC(EVP_sha256(), secret_key, (int)strlen(secret_key), (const unsigned char *)tok.buf, tok.len, mac, &maclen);
    char sig[64];
    base64url(mac, maclen, sig, sizeof sig);
    sbuf_putc(&tok, '.');
    sbuf_puts(&tok, sig);
    return sbuf_steal(&tok, NULL);
}
