package org.dijiang.demo.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Test

class TokenRateTest {
    @Test
    fun countsPiecesAfterTheFirstOverTheTimeSinceIt() {
        val times = longArrayOf(5_000_000_000L, 5_100_000_000L, 5_200_000_000L, 5_400_000_000L)
        var i = 0
        val r = TokenRate { times[i++] }
        r.onPiece()
        assertNull(r.perSecond) // the first piece only closes the prefill
        r.onPiece(); r.onPiece(); r.onPiece()
        assertEquals(4, r.pieces)
        assertEquals(3 / 0.4, r.perSecond!!, 1e-9)
    }

    @Test
    fun noRateWithoutElapsedTime() {
        val r = TokenRate { 7L }
        r.onPiece(); r.onPiece()
        assertNull(r.perSecond)
    }

    @Test
    fun formats() {
        assertEquals("23.4 tok/s", TokenRate.format(23.44))
        assertEquals("– tok/s", TokenRate.format(null))
    }
}
