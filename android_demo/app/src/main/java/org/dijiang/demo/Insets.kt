package org.dijiang.demo

import android.os.Build
import android.view.View
import android.view.WindowInsets

/**
 * Pads [root] clear of the status bar, navigation bar and keyboard. Apps targeting
 * Android 15 are drawn edge to edge, so the layout has to make room itself.
 */
fun padForSystemBars(root: View) {
    root.setOnApplyWindowInsetsListener { v, insets ->
        if (Build.VERSION.SDK_INT >= Build.VERSION_CODES.R) {
            val bars = insets.getInsets(WindowInsets.Type.systemBars() or WindowInsets.Type.ime())
            v.setPadding(bars.left, bars.top, bars.right, bars.bottom)
        } else {
            @Suppress("DEPRECATION")
            v.setPadding(
                insets.systemWindowInsetLeft, insets.systemWindowInsetTop,
                insets.systemWindowInsetRight, insets.systemWindowInsetBottom
            )
        }
        insets
    }
}
