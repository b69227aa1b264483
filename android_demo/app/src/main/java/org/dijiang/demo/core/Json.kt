package org.dijiang.demo.core

/**
 * A small strict JSON reader for the three JSON texts the app reads: the runner's stats,
 * the export's manifest.json and tokenizer.json. Kept here (instead of org.json) so the
 * model-facing logic has no Android dependency and runs in JVM unit tests.
 *
 * Objects become [Map] (key order kept), arrays [List], integers [Long], other numbers
 * [Double], plus [String], [Boolean] and null.
 */
object Json {
    fun parse(text: String): Any? {
        val p = Parser(text)
        p.skipSpace()
        val value = p.value()
        p.skipSpace()
        if (!p.atEnd()) throw p.error("trailing characters")
        return value
    }

    private class Parser(val s: String) {
        var i = 0

        fun atEnd() = i >= s.length

        fun error(what: String) = IllegalArgumentException("bad JSON at offset $i: $what")

        fun skipSpace() {
            while (i < s.length && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) i++
        }

        fun value(): Any? {
            if (atEnd()) throw error("unexpected end")
            return when (s[i]) {
                '{' -> obj()
                '[' -> array()
                '"' -> string()
                't' -> literal("true", true)
                'f' -> literal("false", false)
                'n' -> literal("null", null)
                else -> number()
            }
        }

        private fun literal(word: String, v: Any?): Any? {
            if (!s.startsWith(word, i)) throw error("expected $word")
            i += word.length
            return v
        }

        private fun obj(): Map<String, Any?> {
            val out = LinkedHashMap<String, Any?>()
            i++
            skipSpace()
            if (i < s.length && s[i] == '}') { i++; return out }
            while (true) {
                skipSpace()
                if (atEnd() || s[i] != '"') throw error("expected a key")
                val key = string()
                skipSpace()
                expect(':')
                skipSpace()
                out[key] = value()
                skipSpace()
                if (atEnd()) throw error("unclosed object")
                if (s[i] == ',') { i++; continue }
                expect('}')
                return out
            }
        }

        private fun array(): List<Any?> {
            val out = ArrayList<Any?>()
            i++
            skipSpace()
            if (i < s.length && s[i] == ']') { i++; return out }
            while (true) {
                skipSpace()
                out.add(value())
                skipSpace()
                if (atEnd()) throw error("unclosed array")
                if (s[i] == ',') { i++; continue }
                expect(']')
                return out
            }
        }

        private fun expect(c: Char) {
            if (atEnd() || s[i] != c) throw error("expected '$c'")
            i++
        }

        private fun string(): String {
            i++ // opening quote
            val sb = StringBuilder()
            while (true) {
                if (atEnd()) throw error("unclosed string")
                val c = s[i++]
                when {
                    c == '"' -> return sb.toString()
                    c == '\\' -> {
                        if (atEnd()) throw error("bad escape")
                        when (val e = s[i++]) {
                            '"', '\\', '/' -> sb.append(e)
                            'b' -> sb.append('\b')
                            'f' -> sb.append('\u000C')
                            'n' -> sb.append('\n')
                            'r' -> sb.append('\r')
                            't' -> sb.append('\t')
                            'u' -> {
                                if (i + 4 > s.length) throw error("bad \\u escape")
                                val code = s.substring(i, i + 4).toIntOrNull(16) ?: throw error("bad \\u escape")
                                sb.append(code.toChar())
                                i += 4
                            }
                            else -> throw error("bad escape \\$e")
                        }
                    }
                    c < ' ' -> throw error("control character in string")
                    else -> sb.append(c)
                }
            }
        }

        private fun number(): Any {
            val start = i
            if (i < s.length && s[i] == '-') i++
            while (i < s.length && (s[i] in '0'..'9' || s[i] == '.' || s[i] == 'e' || s[i] == 'E' ||
                    s[i] == '+' || s[i] == '-')) i++
            val text = s.substring(start, i)
            if (text.length == 0 || text == "-") throw error("unexpected character")
            val isInteger = text.indexOf('.') < 0 && text.indexOf('e') < 0 && text.indexOf('E') < 0
            if (isInteger) text.toLongOrNull()?.let { return it }
            return text.toDoubleOrNull() ?: throw error("bad number '$text'")
        }
    }
}

/** Typed accessors over [Json.parse] results, so callers read fields without casts. */
internal fun Any?.field(name: String): Any? = (this as? Map<*, *>)?.get(name)

internal fun Any?.asLong(): Long? = when (this) {
    is Long -> this
    is Double -> if (this == Math.floor(this) && !this.isInfinite()) this.toLong() else null
    else -> null
}

internal fun Any?.asDouble(): Double? = when (this) {
    is Long -> this.toDouble()
    is Double -> this
    else -> null
}

internal fun Any?.asList(): List<Any?>? = this as? List<Any?>
